"""Generated protobuf code (borg.v1); regenerate with python -m borgdqn.proto.generate."""
