"""Quality against ground truth (metrics) and deviation of a reduced model from the dense one (deviation)."""
from spark3r.evaluate.deviation import DEFAULT_WEIGHTS, DenseReference, output_deviation
from spark3r.evaluate.metrics import camera_metrics, depth_metrics, point_metrics, pose_auc, umeyama

__all__ = ["DEFAULT_WEIGHTS", "DenseReference", "output_deviation", "camera_metrics", "depth_metrics", "point_metrics",
           "pose_auc", "umeyama"]
