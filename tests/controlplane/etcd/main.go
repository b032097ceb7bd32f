// Command etcd runs etcd's own entry point (etcdmain), the same code as the released etcd binary,
// so the test bed's API server stores its objects in a real etcd.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
