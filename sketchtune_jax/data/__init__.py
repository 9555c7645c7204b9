"""Data: instruction records and their tokenization (`records`), prompt templates (`prompts`),
packed text windows and every batch source the trainer reads (`batches`), calibration text
(`calibration`)."""
