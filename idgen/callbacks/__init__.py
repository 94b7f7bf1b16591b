"""Lightning and logger glue shared by training and sampling (media logging helpers)."""
