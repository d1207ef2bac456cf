"""idverify: does the photo on an ID chip show the person in front of the camera?"""
import os

# No ONNX Runtime telemetry. From the moment it is imported, onnxruntime keeps a telemetry queue
# (a device id and its events in ~/.cache/Microsoft/DeveloperTools/.onnxruntime/, or under
# XDG_CACHE_HOME, and a `.ses` file in TMPDIR), even after `disable_telemetry_events()`. This
# variable, read when onnxruntime is first imported, stops all of it: it is set here, before any
# of the service's modules can import onnxruntime, and child processes (uvicorn workers) inherit it.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
