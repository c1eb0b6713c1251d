"""Model families as plug-ins (docs/families.md): one folder per family, one interface, one registry.

```python
from mmv_tf import families
family = families.get("mmv")                      # or families.resolve_family(model_dir=...)
model = family.build_model(family.complete_config({}))
family, config, model = families.restore(model_dir)
```
"""
from mmv_tf.families.base import Family, Signature
from mmv_tf.families.model_dir import (MODEL_CONFIG_NAME, VOCAB_NAME, load_config, resolve_family, restore,
                                       save_config, vocabulary_path)
from mmv_tf.families.registry import family_of, get, names, register

__all__ = ["Family", "family_of", "Signature", "MODEL_CONFIG_NAME", "VOCAB_NAME", "get", "load_config", "names", "register",
           "resolve_family", "restore", "save_config", "vocabulary_path"]
