"""TF Serving export of a CLIP model: signatures, warm-up requests, serving configs.

The command line is `export/export.py`; the signature and tensor names are in
`keras_clip.serving.protocol`.
"""
from keras_clip.export.saved_model import (CLIPServingModule, export_saved_model,  # noqa: F401
                                           models_config, read_labels, warmup_requests)
