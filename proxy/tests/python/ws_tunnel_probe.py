"""A websocket client that is not ours (Python `websockets`): opens a `ws-tunnel` websocket
through the edge over TLS and starts HTTP/2 inside it, as agentk does, then checks that kas's
HTTP/2 server answers with its SETTINGS frame.

Usage: ws_tunnel_probe.py URL CA_FILE   (e.g. wss://127.0.0.1:8443/ cert.pem)
"""

import asyncio
import ssl
import sys

import websockets

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS = 0x4


async def main(url, ca_file):
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = False
    async with websockets.connect(url, ssl=ctx, subprotocols=["ws-tunnel"], open_timeout=10) as ws:
        if ws.subprotocol != "ws-tunnel":
            sys.exit(f"subprotocol not agreed: {ws.subprotocol!r}")
        await ws.send(PREFACE + EMPTY_SETTINGS)
        data = b""
        while len(data) < 9:
            msg = await asyncio.wait_for(ws.recv(), timeout=10)
            if not isinstance(msg, bytes):
                sys.exit("text message on a ws-tunnel")
            data += msg
        length = int.from_bytes(data[0:3], "big")
        if data[3] != SETTINGS:
            sys.exit(f"first frame type {data[3]}, expected SETTINGS")
        print(f"ok: HTTP/2 SETTINGS frame of {length} bytes from kas through the tunnel")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
