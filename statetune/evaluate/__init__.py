"""Measuring states: masked loss and perplexity, generation metrics, reports."""
