"""Analysis of trained models: block-by-block similarity of the layer stack (`similarity`)."""
