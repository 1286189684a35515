"""Viewer access control, pure: tokens, the control-stream protocol, per-connection admission.

``tokens`` issues and verifies viewer JWTs (HS256 or EdDSA) and keeps the revocation list;
``secret_file`` says where the HS256 secret lives (the one module here that touches files);
``control`` is the control-stream wire format (a specification a third-party RoQ client can
implement), sans-I/O; ``admission`` decides, per viewer connection, whether and when media may
flow (hello, token, approval of unknown viewers, revocation, permission checks), with the time
passed in; ``pending`` keeps the requests of viewers without a token until an operator answers.
"""
