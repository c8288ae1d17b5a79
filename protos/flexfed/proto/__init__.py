"""flexfed.proto: the Consortium API (generated protobuf code lives in v1/)."""
