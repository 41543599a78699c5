"""A client written from docs/PROTOCOL.md alone (plain pyzmq + msgpack) completes a streamed request."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from test_ingress_harness import Harness, bounded


async def test_raw_dealer_client_streams_a_request():
    h = await Harness().start()
    h.serve_automatically()
    sock = h.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(h.address)
    try:
        request = {"version": 2, "request_id": "r1", "prompt": "Hi €", "max_tokens": 9, "stream": True}
        await sock.send_multipart([bytes([1]), msgpack.packb(request)])
        text, tokens, kinds = "", [], []
        while True:
            type_byte, payload = await bounded(sock.recv_multipart())
            event = msgpack.unpackb(payload)
            assert event["request_id"] == "r1"
            kinds.append(type_byte[0])
            if type_byte[0] == 8:
                text += event["text"]
                tokens += event["token_ids"]
            elif type_byte[0] == 9:
                text += event["text"]
                tokens += event["token_ids"]
                break
            else:
                raise AssertionError(f"unexpected event {type_byte[0]}: {event}")
        prompt = list("Hi €".encode("utf-8"))  # the fake scheduler echoes the prompt cyclically
        assert tokens == [prompt[i % len(prompt)] for i in range(9)]
        assert text == "Hi €Hi "  # 9 bytes: the 6 of the prompt, then 3 more
        assert event["finish_reason"] == "length"
        assert (event["prompt_tokens"], event["completion_tokens"]) == (6, 9)
        assert kinds.count(8) >= 2 and kinds[-1] == 9

        # an error names the request and carries a documented code
        await sock.send_multipart([bytes([1]), msgpack.packb({"version": 2, "request_id": "r2", "prompt": ""
                                                              , "max_tokens": 3})])
        type_byte, payload = await bounded(sock.recv_multipart())
        event = msgpack.unpackb(payload)
        assert type_byte[0] == 10 and event["request_id"] == "r2" and event["code"] == "invalid_request"

        await sock.send_multipart([bytes([3]), msgpack.packb({"request_id": "s"})])
        type_byte, payload = await bounded(sock.recv_multipart())
        event = msgpack.unpackb(payload)
        assert type_byte[0] == 11 and event["request_id"] == "s"
        assert event["values"]["kv_free_blocks"] == event["values"]["kv_total_blocks"]
    finally:
        sock.close(linger=0)
        await asyncio.wait_for(h.close(), 5)
