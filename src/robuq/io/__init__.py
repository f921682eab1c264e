"""robuq's model files and formats: quantized models (``quantized``) and "open whatever this file is"
(``model_files``). The byte-level format — safetensors plus a JSON header, written atomically — is
``robuq.core.files``."""
