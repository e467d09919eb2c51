"""Model card templates (Markdown + Jinja) for ``huggingface_hub.ModelCard.from_template``.

Installed as ``usfmae_hf.publishing.templates``; read them with
``importlib.resources.files("usfmae_hf.publishing.templates") / "NAME.md"``.
"""
