"""An owner's text data: finding, reading, committing to and packing it; the demo corpora."""
