"""Building blocks of the data stages: format readers, text clean-up, script and word counts, the Gopher
quality rules, MinHash, dedup decisions and reports, the tokenizer-family comparison, fine-tuning data."""
