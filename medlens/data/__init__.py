"""Building blocks for images: decode, discover and split datasets, prepare, augment, cache."""
