"""Lightning callbacks: predict-time sample writer (idgen-sample)."""
