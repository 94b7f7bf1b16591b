"""Lightning and logger glue shared by training and sampling (media logging helpers, the
``EMAWeights`` callback of fine-tuning)."""
