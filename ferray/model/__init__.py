"""The model: backbones, the Lite0 conversion, the head, the artifact (model.keras + ferray.json), the registry, the embed stage."""

# An artifact folder's two files (SPEC: Model artifact); every module that reads or writes one uses these.
MODEL_FILE = "model.keras"
META_FILE = "ferray.json"
# Optional beside them: the faces that calibrate the model's int8 LiteRT graphs (ferray.model.lite), so any
# machine exports the same graphs. Whatever copies or publishes a model carries it when it is there.
CALIBRATION_FILE = "calibration.npz"
# `backbone.weights: artifact:MODEL` reuses the backbone of a ferray model.
ARTIFACT_PREFIX = "artifact:"

# backbone.name -> "module:row" (a ferray.model.backbones.Backbone). A new backbone is one module with its
# row and one line here; ferray.config validates `backbone.name` against these names.
BACKBONES: dict[str, str] = {
    "efficientnet-lite0": "ferray.model.lite0:BACKBONE",
    **{f"efficientnet-b{k}": f"ferray.model.efficientnet:B{k}" for k in range(8)},
}
