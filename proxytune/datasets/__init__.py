"""Task data sets (prompts, targets, answer checking) used for tuning and evaluation."""
