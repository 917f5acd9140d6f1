"""Hub tools: the model card (`relformer-card`, `python -m hf_relformer.hub.card`) and the checked upload
(`relformer-upload`, `python -m hf_relformer.hub.upload`)."""
