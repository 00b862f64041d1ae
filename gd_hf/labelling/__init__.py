"""Which unlabeled images to label next: the teacher's signals per image (`signals`), the strategies that rank
them (`ranking`), the resumable pass over the pool (`scoring`) and the labelling job written out (`job`). The
command is `python -m gd_hf.label_next`."""
