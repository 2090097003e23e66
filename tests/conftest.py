import pytest
import torch

import sr3_engine as sr3

# fp32 results here are compared with float64 references and with each other; on a GPU, PyTorch's
# default lets convolutions (and may let matmuls) round their inputs to TF32's 10-bit mantissa.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, as training tests want: on a small shared machine,
    oversubscribed OpenMP threads slow tiny convolutions a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> sr3.SR3UNet:
    torch.manual_seed(1234)
    return sr3.SR3UNet(sr3.UNetConfig.named("tiny")).eval()


def oracle_denoiser(y0: torch.Tensor, noise_level_input: str = "sqrt_gamma", prediction: str = "eps"):
    """A 'network' that returns the true target of y_t for a known y0:
    eps = (y_t - sqrt(gamma) y0) / sqrt(1 - gamma), y0 itself, or v = sqrt(gamma) eps - sqrt(1 - gamma) y0."""

    def denoise(x_up, y_t, noise_level):
        level = noise_level.double().view(-1, 1, 1, 1)
        gamma = level * level
        eps = (y_t.double() - level * y0.double()) / torch.sqrt(1.0 - gamma)
        target = {"eps": eps, "y0": y0.double().expand_as(eps),
                  "v": level * eps - torch.sqrt(1.0 - gamma) * y0.double()}[prediction]
        return target.to(y_t.dtype)

    return denoise
