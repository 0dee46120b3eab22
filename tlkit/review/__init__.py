"""What a saved model does for a user: predict, explain, attack, export, and the served MLflow pyfunc model
(serving; pyfunc_model is the code file every logged model carries).
"""
