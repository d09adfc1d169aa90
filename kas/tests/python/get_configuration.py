"""A gRPC client that is not ours: Python grpcio, stubs generated from proto/protos.

Usage: get_configuration.py TARGET TOKEN [--tls CA_FILE --authority HOST] [--websocket]
Prints the first configuration as JSON and exits 0, or exits non-zero with the error.
"""

import argparse
import json
import os
import sys
import tempfile

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto", "protos"))


def generate(out):
    files = ["entity.proto", "agentcfg.proto", "agent_configuration.proto"]
    code = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("token")
    parser.add_argument("--tls", metavar="CA_FILE")
    parser.add_argument("--authority")
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="kas-py-")
    generate(out)
    import grpc
    import agent_configuration_pb2 as pb
    import agent_configuration_pb2_grpc as pb_grpc

    options = []
    if args.authority:
        options.append(("grpc.ssl_target_name_override", args.authority))
        options.append(("grpc.default_authority", args.authority))
    if args.tls:
        with open(args.tls, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    stub = pb_grpc.AgentConfigurationStub(channel)
    stream = stub.GetConfiguration(
        pb.ConfigurationRequest(),
        metadata=[("authorization", f"Bearer {args.token}")],
        timeout=15,
    )
    first = next(stream)
    cfg = first.configuration
    print(json.dumps({
        "commit_id": first.commit_id,
        "agent_id": cfg.agent_id,
        "project_id": cfg.project_id,
        "project_path": cfg.project_path,
        "gitlab_external_url": cfg.gitlab_external_url,
        "logging_level": cfg.observability.logging.level,
    }))
    stream.cancel()


if __name__ == "__main__":
    main()
