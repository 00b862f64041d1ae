"""Evaluation: COCO mask AP (`mask_ap`: post-processing, COCOeval, the one driver of training and
`python -m gd_hf.evaluate`) and `CocoMaskAP`, the same metric for the `evaluate` library (`coco_metric`)."""
