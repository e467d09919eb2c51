"""Image layer: USF-MAE's exact image processor, training augmentations, and ultrasound clean-up
(scan-area crop, de-annotation)."""
