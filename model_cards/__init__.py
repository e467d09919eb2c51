"""Model card templates (Markdown + Jinja) for ``huggingface_hub.ModelCard.from_template``.

Installed as ``usfmae_hf.model_cards``; read them with
``importlib.resources.files("usfmae_hf.model_cards") / "NAME.md"``.
"""
