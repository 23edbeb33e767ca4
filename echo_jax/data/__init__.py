"""Episodes to fixed-shape token arrays: rendering, tokenizing, role masks, packing, the corpus."""
