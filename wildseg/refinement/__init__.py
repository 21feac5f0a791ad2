"""Single-image refinement of per-pixel class scores: PAMR (`pamr`) and the dense CRF (`crf`, on the permutohedral
lattice of `lattice` where it runs in torch)."""
