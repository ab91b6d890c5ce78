"""
cosedge: an edge daemon that serves COS-style buckets from local disk with
back-to-origin.

A request for a missing object is answered with a 302 to the bucket's origin
and the object is copied from the origin into the bucket in the background, so
the next request is a local hit.
"""
