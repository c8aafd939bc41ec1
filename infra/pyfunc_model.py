"""The MLflow pyfunc flavour of a registered tokenizer (kept apart from ``infra.model_store`` so that
loading a model, e.g. in every tokenization actor, does not import ``mlflow.pyfunc``: ~1.7 s)."""

import mlflow.pyfunc
import numpy as np


class NativeCheckpoint(mlflow.pyfunc.PythonModel):
    """A pyfunc over a native checkpoint: VQGAN -> codes of float images in [-1, 1] (B, C, H, W)."""

    def load_context(self, context):
        from models import checkpoint

        self.model, _ = checkpoint.load_native(context.artifacts["checkpoint"])
        self.model.eval()

    # an array in, an array out: the hint tells mlflow there is no schema to infer (else it warns)
    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.model.encode(x)[2].numpy()
