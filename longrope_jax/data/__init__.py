"""Data: corpus sources, the KJV builder, tokenizers, packing, passkey documents, grain loaders."""
