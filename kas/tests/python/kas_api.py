"""GitLab's side of kas's API port, as a client that is not ours: Python grpcio with stubs
generated from proto/protos, and the JWT GitLab signs (HS256, audience gitlab-kas, issuer
GitLab's host) built here from the shared secret file.

Usage:
  kas_api.py TARGET SECRET_FILE push PROJECT_ID FULL_PATH
  kas_api.py TARGET SECRET_FILE agents (--project-id N | --agent-id N)
SECRET_FILE may be "-" (no JWT) or "bad" (a JWT signed with another secret).
Prints one JSON line; on a gRPC error prints {"error": CODE_NAME, "details": ...} and exits 3.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto", "protos"))


def generate(out):
    files = ["entity.proto", "agent_tracker.proto", "agent_tracker_rpc.proto", "event.proto", "notifications.proto"]
    code = protoc.main(["protoc", f"-I{PROTOS}", f"-I{os.path.dirname(protoc.__file__)}/_proto",
                        f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(secret):
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"iss": "gitlab.example.com", "aud": "gitlab-kas",
                                "iat": now, "nbf": now - 5, "exp": now + 60}).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("secret_file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    push = sub.add_parser("push")
    push.add_argument("project_id", type=int)
    push.add_argument("full_path")
    agents = sub.add_parser("agents")
    agents.add_argument("--project-id", type=int)
    agents.add_argument("--agent-id", type=int)
    args = parser.parse_args()

    out = tempfile.mkdtemp(prefix="kas-py-api-")
    generate(out)
    import grpc
    import agent_tracker_rpc_pb2 as tracker_pb
    import agent_tracker_rpc_pb2_grpc as tracker_grpc
    import event_pb2
    import notifications_pb2 as notifications_pb
    import notifications_pb2_grpc as notifications_grpc

    metadata = []
    if args.secret_file == "bad":
        metadata.append(("authorization", f"Bearer {jwt(os.urandom(32))}"))
    elif args.secret_file != "-":
        with open(args.secret_file) as f:
            secret = base64.b64decode(f.read().strip())
        metadata.append(("authorization", f"Bearer {jwt(secret)}"))

    channel = grpc.insecure_channel(args.target)
    try:
        if args.cmd == "push":
            stub = notifications_grpc.NotificationsStub(channel)
            event = event_pb2.GitPushEvent(project=event_pb2.Project(id=args.project_id, full_path=args.full_path))
            stub.GitPushEvent(notifications_pb.GitPushEventRequest(event=event), metadata=metadata, timeout=10)
            print(json.dumps({"ok": True}))
        else:
            stub = tracker_grpc.AgentTrackerStub(channel)
            if args.project_id is not None:
                request = tracker_pb.GetConnectedAgentsRequest(project_id=args.project_id)
            else:
                request = tracker_pb.GetConnectedAgentsRequest(agent_id=args.agent_id)
            response = stub.GetConnectedAgents(request, metadata=metadata, timeout=10)
            print(json.dumps({"agents": [{
                "agent_id": a.agent_id,
                "project_id": a.project_id,
                "connection_id": a.connection_id,
                "connected_at": a.connected_at.seconds,
                "version": a.agent_meta.version,
                "commit_id": a.agent_meta.commit_id,
                "pod_namespace": a.agent_meta.pod_namespace,
                "pod_name": a.agent_meta.pod_name,
            } for a in response.agents]}))
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "details": e.details()}))
        sys.exit(3)


if __name__ == "__main__":
    main()
