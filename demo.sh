#!/bin/bash
# Usage: ./demo.sh [--maskrcnn]   — sets up .venv, then runs the main job on locally generated demo data:
#   generate synthetic microscopy images -> build the train/test LMDBs -> train a small UNet briefly
#   -> segment the images with it and score them against their masks -> show where the outputs are.
#   --maskrcnn adds instance segmentation, both ways, on the same databases (instance labels): a small
#   Mask R-CNN (anchors sized from the data's objects) and a UNet trained on boundary targets with a
#   seeded watershed; both segment the whole images and are scored by the same object matching
#   (accuracy, precision, recall, DSB score, COCO AP; a few more minutes on a laptop CPU).
# Everything goes to ./demo_run (deleted and rebuilt on each run).
set -euo pipefail
cd "$(dirname "$0")"
maskrcnn=0
case "${1:-}" in
    --maskrcnn) maskrcnn=1 ;;
    "") ;;
    *) echo "usage: ./demo.sh [--maskrcnn]" >&2; exit 2 ;;
esac
source scripts/setup_env.sh
set -euo pipefail
rm -rf demo_run
python -m enki_seg.data.demo --output_folder demo_run/data --count 24 --height 512 --width 512 --seed 0
python build_lmdb.py --image_folder demo_run/data/images --mask_folder demo_run/data/masks \
    --instance_folder demo_run/data/instances --output_folder demo_run/lmdb --dataset_name demo \
    --image_format tif --use_tiling 1 --tile_size 256 --number_classes 3 --seed 0
# a small UNet for a short CPU run (the full NIST UNet is --depth 4 --base_filters 64)
python train_unet.py --train_database demo_run/lmdb/train-demo.lmdb \
    --test_database demo_run/lmdb/test-demo.lmdb --output_dir demo_run/unet \
    --number_classes 3 --batch_size 4 --learning_rate 3e-3 --test_every_n_steps 20 --max_steps 60 \
    --early_stopping 5 --reader_count 1 --depth 3 --base_filters 8 --dropout 0.0 --seed 0
# whole 512x512 images, tiled as in training (256) with overlap; all 24 images, train and test split alike
python inference.py --model demo_run/unet --image_folder demo_run/data/images --image_format tif \
    --mask_folder demo_run/data/masks --output_folder demo_run/inference --save_overlay 1
if [ "$maskrcnn" = 1 ]; then
    # small preset (GroupNorm backbone, FPN P2-P4 at 64 channels), 256x256 tiles; --number_classes counts background
    python train_maskrcnn.py --train_database demo_run/lmdb/train-demo.lmdb \
        --test_database demo_run/lmdb/test-demo.lmdb --output_dir demo_run/maskrcnn \
        --number_classes 3 --batch_size 2 --learning_rate 1e-3 --test_every_n_steps 100 --max_steps 300 \
        --warmup_steps 20 --early_stopping 5 --seed 0
    python inference.py --model demo_run/maskrcnn --image_folder demo_run/data/images --image_format tif \
        --mask_folder demo_run/data/instances --class_folder demo_run/data/masks \
        --output_folder demo_run/maskrcnn_inference --save_overlay 1
    # the same instances from a UNet: background / interior / boundary targets, seeded watershed at inference
    python train_unet.py --train_database demo_run/lmdb/train-demo.lmdb \
        --test_database demo_run/lmdb/test-demo.lmdb --output_dir demo_run/boundary \
        --instance_target boundary --number_classes 3 --batch_size 4 --learning_rate 3e-3 \
        --loss cross_entropy+dice --test_every_n_steps 50 --max_steps 150 --early_stopping 5 --reader_count 1 \
        --depth 3 --base_filters 8 --dropout 0.0 --seed 0
    python inference.py --model demo_run/boundary --image_folder demo_run/data/images --image_format tif \
        --mask_folder demo_run/data/instances --output_folder demo_run/boundary_inference --save_overlay 1
    # any two folders of instance labels (other tools' too), scored alike: here the two methods side by side
    for method in maskrcnn boundary; do
        echo "$method:"
        python evaluate.py --instance 1 --prediction_folder "demo_run/${method}_inference" \
            --mask_folder demo_run/data/instances --output_folder "demo_run/${method}_evaluation" \
            > "demo_run/${method}_evaluation.txt"
        grep -E "^ +IoU|^ 0\.50|^ 0\.75|^DSB score|^COCO" "demo_run/${method}_evaluation.txt" || true
    done
fi
echo
echo "Outputs:"
echo "  demo data          demo_run/data/{images,masks,instances,coco.json}"
echo "  databases          demo_run/lmdb/train-demo.lmdb, demo_run/lmdb/test-demo.lmdb"
echo "  manifest           demo_run/lmdb/manifest-demo.csv"
echo "  training curves    demo_run/unet/curves.png   (numbers: demo_run/unet/metrics.csv)"
echo "  TensorBoard        tensorboard --logdir demo_run/unet/tensorboard"
echo "  exported model     demo_run/unet/model.keras, demo_run/unet/saved_model/, demo_run/unet/config.json"
echo "  run summary        demo_run/unet/summary.json"
echo "  predicted masks    demo_run/inference/*.tif   (uint8 labels, named like the images)"
echo "  overlays           demo_run/inference/overlays/*.png"
echo "  inference metrics  demo_run/inference/metrics.json, metrics.csv, metrics_per_image.csv"
if [ "$maskrcnn" = 1 ]; then
    echo "  Mask R-CNN run      demo_run/maskrcnn/ (metrics.csv: COCO box/mask AP per test interval)"
    echo "  instance labels     demo_run/maskrcnn_inference/*.tif, detections.json (COCO results), metrics.json"
    echo "  boundary UNet run   demo_run/boundary/, instances: demo_run/boundary_inference/ (watershed)"
    echo "  both scored alike   demo_run/{maskrcnn,boundary}_evaluation/metrics.json, *_evaluation.txt (evaluate.py --instance 1)"
fi
