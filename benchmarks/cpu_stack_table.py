"""Markdown table of benchmarks/cpu_stack.sh's JSON lines (compare_torch results)."""
import json
import sys


def main(path: str) -> None:
  rows = [json.loads(line) for line in open(path) if line.strip()]
  print(f"{path}: jax {rows[0]['versions']['jax']} (Python {rows[0]['versions']['python']}), "
        f"torch {rows[0]['versions']['torch']} (Python {rows[0]['versions']['torch_python']})\n")
  print("| model | batch | dtype | ours img/s | PyTorch img/s | ours / PyTorch (median of rounds) "
        "| CPU-time ratio | load avg (before, after) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['ours_images_per_sec']:.1f} | "
          f"{r['torch_images_per_sec']:.1f} | {r['ratio']:.2f}x | {r['cpu_time_ratio']:.2f}x | "
          f"{', '.join(map(str, r['load_average_1min']))} |")


if __name__ == "__main__":
  main(sys.argv[1])
