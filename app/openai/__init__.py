"""The OpenAI Images API over our jobs (`POST /v1/images/generations`, `/edits`,
`/variations`), as its own front:

- `errors`: OpenAI's error shape, and the route class that answers every error in it;
- `models`: the request, response and event shapes (bounds read from `GenerationSpec`);
- `forms`: the multipart forms of edits and variations (`app/multipart.py` reads them);
- `mapping`: a request onto the native one (the class a prompt names, the size);
- `output`: images in the asked format, as JSON or as OpenAI's SSE events;
- `wait`: submit, then follow the job to its end, cancelling it if the request ends
  first;
- `routes`: the router.

A request goes routes → forms → mapping → wait (→ output), each step once: the same
catalog lookup, checks, `fit_inputs` and admission as `POST /v1/generations`.
"""
