"""The file MLflow runs to load a tlkit model (MLflow's models-from-code): the model folder holds no pickle.

`tracking.log_model` saves this file as the pyfunc model's code; `mlflow models serve` and
`mlflow.pyfunc.load_model` execute it, and it names the model class (tlkit.review.serving.ImageModel).
"""

import mlflow.models

from tlkit.review.serving import ImageModel

mlflow.models.set_model(ImageModel())
