"""Evaluation: perplexity on held-out text (`perplexity`), generation tasks scored by answer
(`tasks`), multiple choice by log-likelihood (`multiple_choice`), their settings (`settings`),
and pairwise LLM judging (`judge`)."""
