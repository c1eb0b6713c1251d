"""mmv_tf: self-supervised multimodal video models (MMV, VATT, BraVe) in TensorFlow / Keras 3.

The stack is pinned exactly (see DESIGN section 1 and docs/stack.md): TensorFlow 2.17.1 is the newest
TF on which tensorflow-io 0.37.1 loads, and tf-models-official / tensorflow-text / serving-api follow it.
"""
import setuptools

# Exact pins: every one of these is imported by the package or its tests.
INSTALL_REQUIRES = [
    "tensorflow==2.17.1",
    "keras==3.15.1",
    "tensorflow-text==2.17.0",
    "tensorflow-io==0.37.1",
    "tf-models-official==2.17.0",
    "tensorflow-serving-api==2.17.1",
    "gin-config==0.5.0",
    "tf-keras==2.17.0",  # only because tf-models-official requires it; never imported by mmv_tf.
    "tensorflow-metadata==1.16.1",  # newer needs protobuf>=5 and breaks `import official.vision`.
    "av==18.1.0",  # PyAV with bundled FFmpeg: video/audio decoding for make-dataset and query.
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
    "numpy==1.26.4",
    "pillow==12.3.0",  # JPEG encode/decode in the dataset writers.
]

EXTRAS_REQUIRE = {
    "beam": ["apache-beam==2.77.0"],
    "test": [
        "apache-beam==2.77.0",
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "pytest-timeout==2.4.0",
        "psutil==7.2.2",
    ],
}

setuptools.setup(
    name="mmv_tf",
    version="0.1.0",
    description="Self-supervised multimodal video models (MMV, VATT, BraVe) in TensorFlow/Keras 3: "
    "data, distributed pretraining, evaluation and TF Serving export.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9,<3.13",
    packages=setuptools.find_packages(include=["mmv_tf", "mmv_tf.*"]),
    package_data={"mmv_tf": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["mmv-tf = mmv_tf.cli:main"]},
)
