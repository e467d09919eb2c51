"""Model layer: the MAE key table, safe checkpoint reading, conversion to and from Hugging Face
directories, the timm-based reference MAE that verifies conversions, and quiet model loading."""
