#!/bin/bash
# Usage: ./demo.sh   — sets up .venv, then runs the main job on locally generated demo data:
#   generate synthetic microscopy images -> build the train/test LMDBs -> print the summary.
# Everything goes to ./demo_run (deleted and rebuilt on each run).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
set -euo pipefail
rm -rf demo_run
python demo_data.py --output_folder demo_run/data --count 24 --height 512 --width 512 --seed 0
python build_lmdb.py --image_folder demo_run/data/images --mask_folder demo_run/data/masks \
    --instance_folder demo_run/data/instances --output_folder demo_run/lmdb --dataset_name demo \
    --image_format tif --use_tiling 1 --tile_size 256 --number_classes 3 --seed 0
echo
echo "Outputs:"
echo "  demo data        demo_run/data/{images,masks,instances,coco.json}"
echo "  databases        demo_run/lmdb/train-demo.lmdb, demo_run/lmdb/test-demo.lmdb"
echo "  manifest         demo_run/lmdb/manifest-demo.csv"
