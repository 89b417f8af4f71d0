package inpod

//go:generate sh -c "cd ../.. && PATH=$PWD/../../bin:$PATH protoc -I proxylib/inpod/zds --go_out=. --go_opt=module=github.com/ambientmesh/ambient proxylib/inpod/zds/zds.proto"
