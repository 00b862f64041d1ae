"""COCO mask AP as an `evaluate` metric (`CocoMaskAP`): its own module, so that only its users import the
`evaluate` library."""

from __future__ import annotations

import datasets
import evaluate

from gd_hf.evaluation.mask_ap import coco_mask_ap


class CocoMaskAP(evaluate.Metric):
    """COCO mask AP as an `evaluate` metric.

    Each row is one image: `predictions` its instances (COCO results without `image_id`) and `references` its
    image id. `compute(annotation_file=...)` names the ground-truth COCO instances JSON (read as training reads
    it: a missing `iscrowd`, box-only objects or id 0 do not break it).

        metric = CocoMaskAP()
        metric.add_batch(predictions=[[{"category_id": 1, "score": 0.9, "segmentation": rle}]], references=[42])
        metric.compute(annotation_file="instances_val.json")  # {"AP": ..., "AP50": ..., ...}
    """

    def _info(self) -> evaluate.MetricInfo:
        instance = {
            "category_id": datasets.Value("int64"),
            "score": datasets.Value("float32"),
            "segmentation": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
        }
        return evaluate.MetricInfo(
            description="COCO mask AP (COCOeval protocol, iouType=segm; hotcoco, checked against pycocotools), x100.",
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            features=datasets.Features({"predictions": datasets.List(instance), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, annotation_file: str | None = None) -> dict[str, float]:
        if annotation_file is None:
            raise ValueError("CocoMaskAP.compute needs annotation_file= (the ground-truth COCO instances JSON)")
        results = []
        for image_id, instances in zip(references, predictions):
            # datasets turns a list of dicts into a dict of lists; accept both.
            if isinstance(instances, dict):
                instances = [dict(zip(instances, values)) for values in zip(*instances.values())]
            for instance in instances:
                results.append({**instance, "image_id": int(image_id)})
        return coco_mask_ap(annotation_file, results, image_ids=[int(i) for i in references])
