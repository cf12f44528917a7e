"""The visualize command line: Figure 2 for given images from a pre-training workdir or an
official-format .pth."""
import numpy as np
import pytest
from PIL import Image

from mae_jax import models
from mae_jax.interop import convert, export
from mae_jax.models.mae import num_visible
from mae_jax.tools import visualize
from tests.helpers import MODEL, run_tool

pytestmark = pytest.mark.slow  # every test runs the command, on the tiny pre-training's workdir

SIZE, GAP, PATCH = 32, 2, 4


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  """A colour image that needs resizing and cropping, and a grayscale one like Fashion-MNIST."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  colour, gray = str(folder / "colour.png"), str(folder / "gray.png")
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(colour)
  Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8)).save(gray)
  return [colour, gray]


def figure_cells(path, rows, zoom):
  """{(row, column): (SIZE, SIZE, 3) uint8} of a written figure, after checking its size."""
  figure = np.asarray(Image.open(path).convert("RGB"))
  assert figure.shape == (zoom * (rows * (SIZE + GAP) - GAP), zoom * (4 * (SIZE + GAP) - GAP), 3)
  figure = figure[::zoom, ::zoom]
  step = SIZE + GAP
  return {(i, j): figure[i * step:i * step + SIZE, j * step:j * step + SIZE]
          for i in range(rows) for j in range(4)}


def patches(cell):
  return cell.reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH, 3).swapaxes(1, 2).reshape(
      -1, PATCH, PATCH, 3)


def check_figure(cells, image_files, mask_ratio):
  for row, path in enumerate(image_files):
    masked, recon, pasted, original = (patches(cells[row, j]) for j in range(4))
    expected = np.round(visualize.load_image(path, SIZE) * 255).astype(np.uint8)
    np.testing.assert_array_equal(cells[row, 3], expected)
    visible = np.all(masked == original, axis=(1, 2, 3))
    assert visible.sum() == num_visible((SIZE // PATCH) ** 2, mask_ratio)
    assert np.all(masked[~visible] == 128)  # removed patches are mid-grey
    np.testing.assert_array_equal(pasted[visible], original[visible])
    np.testing.assert_array_equal(pasted[~visible], recon[~visible])
    assert not np.array_equal(recon, original)
  gray_original = cells[1, 3]
  assert np.array_equal(gray_original[..., 0], gray_original[..., 2])


def test_figure_from_a_pretraining_workdir(pretrained, image_files, tmp_path):
  out = str(tmp_path / "fig.png")
  result = run_tool("visualize", f"--init={pretrained}", *(f"--image={p}" for p in image_files),
                    f"--out={out}")
  assert result.returncode == 0, result.stderr
  check_figure(figure_cells(out, rows=2, zoom=1), image_files, mask_ratio=0.75)
  # The tiny config trains with norm_pix_loss: the figure says how masked patches are shown.
  assert f"note: {visualize.NORM_PIX_NOTE}" in result.stdout
  assert Image.open(out).text["Comment"] == visualize.NORM_PIX_NOTE


def test_figure_from_an_official_pth(pretrained, image_files, tmp_path):
  _, _, params = export.restore_pretrain_params(pretrained)
  pth = str(tmp_path / "mae_visualize_vit_test.pth")
  convert.save_official(params, models.create_model(MODEL), pth)
  out = str(tmp_path / "fig.png")
  result = run_tool("visualize", f"--init={pth}", f"--model={MODEL}", "--mask_ratio=0.5",
                    "--seed=3", "--zoom=2", *(f"--image={p}" for p in image_files), f"--out={out}")
  assert result.returncode == 0, result.stderr
  check_figure(figure_cells(out, rows=2, zoom=2), image_files, mask_ratio=0.5)
  assert "note:" not in result.stdout and "Comment" not in Image.open(out).text

  result = run_tool("visualize", f"--init={pth}", f"--image={image_files[0]}", f"--out={out}")
  assert result.returncode == 1 and "name its size with --model" in result.stderr


def test_sources_without_a_decoder_are_refused(pretrained, tmp_path):
  _, _, params = export.restore_pretrain_params(pretrained)
  encoder_pth = str(tmp_path / "mae_pretrain_vit_test.pth")
  convert.save_official(params, models.create_model(MODEL), encoder_pth, encoder_only=True)
  with pytest.raises(ValueError, match="holds no decoder"):
    visualize.load_mae(encoder_pth, MODEL)
  exported = export.export_encoder(pretrained, str(tmp_path / "encoder"))
  with pytest.raises(ValueError, match="is an exported encoder"):
    visualize.load_mae(exported)
  with pytest.raises(ValueError, match="describe an --init file"):
    visualize.load_mae(pretrained, MODEL)
  with pytest.raises(ValueError, match="Cannot read the image"):
    visualize.load_image(str(tmp_path / "missing.png"), SIZE)
