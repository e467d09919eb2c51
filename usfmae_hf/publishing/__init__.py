"""Publishing: model cards rendered from templates (``templates/``) and Hub uploads."""
