"""Sketching a model: the layer-by-layer driver (`driver`), the streaming source that reads one
decoder layer at a time (`streaming`), resumable ``.partial`` directories, per-layer tuning
(`layer_tune`), and the maths on one weight matrix (`matrix`: Hessians, weighted k-means, the
error-feedback column sweep)."""
