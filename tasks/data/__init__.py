"""Building blocks of the data stages: format readers, quality filters, MinHash."""
