"""Real input for the main job and the benchmarks: the GloVe 6B 50d table and the standard-library text."""
