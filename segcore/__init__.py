"""segcore: the pure training core of segtrain.

Plain Python + torch/transformers/timm; no gRPC, database or object store, so
every piece works from a notebook. Modules (import them directly; this package
file stays empty so ``import segcore.errors`` does not pull in torch):

* ``errors``        - SegcoreError and its subclasses (carry field/tile names)
* ``catalogue``     - the architectures as facts: names, descriptions, parameter counts,
                      memory figures (no torch; the pipeline service lists and validates from it)
* ``architectures`` - @register_architecture registry, build_model, load_pretrained_backbone
* ``annotations``   - render_tile / load_collection: annotation formats to class-index
                      masks with issue reports (a package; no torch)
* ``hyperparameters`` - the training-parameter contract: names, types, defaults, bounds
                      (no torch; the services and the CLI import it)
* ``imaging``       - decode_image (native pixel type and units) / decode_mask / encode_mask_png
                      (Pillow/tifffile, no torch)
* ``intensity``     - Normalization modes (percentile, dataset, imagenet), image profiles and the
                      choice "auto" makes (numpy only)
* ``splits``        - deterministic, grouped, stratified split_train_val
* ``metrics``       - ConfusionMatrix (epoch-level IoU, pixel accuracy)
* ``config``        - TrainConfig (defaults and validation from ``hyperparameters``)
* ``advice``        - overfitting/plateau advice and degenerate-model quality issues
* ``data``          - Sample, batching (batch-of-one policy), augmentation, padding
* ``losses``        - CE / Dice / CE+Dice, class weights
* ``progress``      - EpochResult, TrainingObserver protocol (4 hooks)
* ``state``         - TrainingState (resumable snapshot), RNG capture/restore
* ``tiles``         - tiles streamed from any TileSource: the checking pass, the DataLoader
                      BatchStream, the prepared-tile cache
* ``distributed``   - Group: what data-parallel ranks share and split (batch shares,
                      all-reduced sums, agreed decisions)
* ``admission``     - a job's memory estimate and what to change when it cannot fit (no torch)
* ``training``      - train() / evaluate() (re-exports config/state/progress types)
* ``checkpoint``    - export_model / load_model (safetensors + ModelMeta),
                      save_training_state / load_training_state, environment_info
* ``inference``     - predict_mask (sliding window), class_pixel_counts
* ``export``        - the model in formats other tools load: a transformers directory, ONNX,
                      TorchScript, each checked against the model
* ``synthetic``     - synthetic labelled tiles for demos and tests
* ``regimes``       - synthetic tiles of five imaging regimes (8-bit brightfield, dim 16-bit and
                      12-bit fluorescence, float with an offset, H&E-like RGB)
"""
