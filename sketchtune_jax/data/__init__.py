"""Data: text sources and the fraction a job reads (`text`), instruction records and their
tokenization (`records`), prompt templates (`prompts`), packed text windows and every batch source
the trainer reads (`batches`), calibration windows (`calibration`), Hugging Face hub access (`hub`)."""
