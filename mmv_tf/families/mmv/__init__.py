"""MMV: video, audio and text towers with FAC / shared / disjoint heads (family.py)."""
from mmv_tf.families import registry
from mmv_tf.families.mmv.family import FAMILY

registry.register(FAMILY)
